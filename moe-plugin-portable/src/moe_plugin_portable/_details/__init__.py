"""Triton kernels of moe-plugin-portable (private: the public wrappers live one level up)."""
