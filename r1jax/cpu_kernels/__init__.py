"""C++ kernels for XLA:CPU (XLA FFI handlers), built on first use; see `build`.

Each op has a jnp reference with the same signature, which runs wherever the kernel does not
(other platforms, other dtypes or shapes, no C++ compiler, `ModelConfig.cpu_kernels=False`).
"""
