"""A local development cluster: API emulator, S3 server and pod runner for `lora-operator dev up`."""
