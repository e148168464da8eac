"""flashtile inside other libraries' code paths: PyTorch SDPA's flash backend
(``sdpa_flash``, registered on import, activated by the user)."""
