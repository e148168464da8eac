"""From a call to kernel launches: device facts (``device``), the checked-in
launch-configuration table (``table``), choosing a config and tuning
(``choose``, ``autotune``), launch plans (``plans``), and one launcher per kernel
family (``attention``, ``decode``, ``l2norm``, ``index_stats``)."""
