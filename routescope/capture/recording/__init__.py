"""Recording: the hooks, step buffers, token identity and compiled sink of `rs.record`."""
