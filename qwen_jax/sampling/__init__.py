"""Host-side sampling utilities: prompt encoding for the Qwen-Image pipeline."""
