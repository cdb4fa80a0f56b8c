"""Triton kernels of moe-plugin-amd (imported when a kernel first runs, never at registration)."""
