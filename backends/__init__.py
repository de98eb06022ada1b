"""balancer's test worker: a small aiohttp server that balancer spawns and proxies to.

A separate program: it never imports `balancer`. Run it with `python -m backends --port N`; the
endpoints are listed in `backends.app`, the process lifecycle in `backends.worker`.

Kept free of imports so that `python -m backends` can arm parent-death detection before loading
aiohttp (see `backends.__main__`).
"""
