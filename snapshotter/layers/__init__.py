"""Layers: which index serves a layer (or a fallback), and the layer's file tree."""
