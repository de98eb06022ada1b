"""balancer: an HTTP reverse-proxy load balancer with a supervised worker pool."""
