"""lora_trainer: LoRA fine-tuning of diffusers Stable Diffusion models that resumes exactly."""

__version__ = "0.1.0"
