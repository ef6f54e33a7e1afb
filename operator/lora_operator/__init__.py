"""lora_operator: a Kopf operator that runs LoRATrainingJobs and recovers them from preemption."""

__version__ = "0.1.0"
