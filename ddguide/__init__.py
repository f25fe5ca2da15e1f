"""ddguide: conditional generation from unconditional diffusion models using denoiser representations."""

__version__ = "0.1.0"
