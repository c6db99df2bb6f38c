"""Test helpers that run real servers on loopback: a token issuer and a fault-injecting proxy."""
