"""`make bench`: the gateway's speed and memory against a raw panoramisk baseline."""
