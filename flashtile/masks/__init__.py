"""Block masks for block-sparse attention: :class:`~flashtile.BlockMask`, its
builders, and ready-made patterns."""
