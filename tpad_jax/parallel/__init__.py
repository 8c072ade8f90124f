"""Device mesh, logical axis rules, sharded initialisation and multi-host set-up."""
