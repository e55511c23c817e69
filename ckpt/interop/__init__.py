"""Other formats in and out: safetensors, torch.save files, torch.distributed.checkpoint directories."""
