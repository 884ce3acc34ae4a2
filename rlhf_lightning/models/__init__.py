"""Policy backbones (TinyGPT, the Hugging Face adapter), heads and generation."""
