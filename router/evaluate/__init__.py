"""The router's own policies on the virtual-clock cluster (``kvscale eval routing``)."""
