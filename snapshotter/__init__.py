"""lazysnap: a containerd remote snapshotter that starts containers before their images are downloaded."""

__version__ = "0.1.0"
