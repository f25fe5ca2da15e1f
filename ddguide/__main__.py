from ddguide.cli import main

main()
