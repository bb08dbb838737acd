"""containerd's own API, as a client: what `lazysnap rpull` uses to pull into containerd."""
