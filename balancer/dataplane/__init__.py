"""The request path: everything that runs per request on the data port (see the README's "Layout")."""


def compiled() -> bool:
    """True when the request path runs compiled by mypyc (``make native``, see setup.py)."""
    from . import proxy

    return not proxy.__file__.endswith(".py")
