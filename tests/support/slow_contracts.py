"""A contracts module whose import takes SLOW_ROUTER_START seconds in the router
process only: a router that is alive and beating but slow to become ready (as with
the recovery of a big journal)."""

import multiprocessing
import os
import time

if multiprocessing.current_process().name == "router":
    time.sleep(float(os.environ.get("SLOW_ROUTER_START", "0")))
