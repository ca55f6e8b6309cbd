"""Configuration: the flags, the DeepSpeed JSON and its checks, resolved once into a typed `RunConfig`."""
