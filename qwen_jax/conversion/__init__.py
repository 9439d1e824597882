"""Weight conversion: diffusers / ComfyUI / transformers safetensors <-> qwen_jax folders."""
