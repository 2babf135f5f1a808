"""``avatar-kernels`` commands: one module per tool verb (``info``, ``bench``: ``add_arguments`` and
``run``) and one per system (``anchored``: ``add_<verb>_arguments`` and ``run_<verb>``), see
:mod:`samplers.cli`."""
