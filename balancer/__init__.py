"""balancer: an HTTP reverse-proxy load balancer with a supervised worker pool."""


def compiled() -> bool:
    """True when the request path runs compiled by mypyc (``make native``, see setup.py)."""
    from .dataplane import proxy

    return not proxy.__file__.endswith(".py")
