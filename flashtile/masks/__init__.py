"""Block masks for block-sparse attention: ``BlockMask``, its
builders, and ready-made patterns."""
