"""The public functions: argument checks with clear errors, layouts, and the
call into the ops. No kernels and no launch logic here."""
