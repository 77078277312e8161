"""kubeloop: the production ML loop, declared with Kubernetes custom resources, runnable on one machine."""

__version__ = "0.1.0"
