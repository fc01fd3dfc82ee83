"""Model backends. Import submodules explicitly: importing this package loads no native library."""
