"""cloudroutes: a flannel-compatible container-network control plane."""

__version__ = "0.1.0"
