"""Adapters the train stage can fit on the frozen 4-bit base. The stages use ``edgepeft.adapters.api``; the own
methods' modules are ``bottleneck``, ``lora``, ``prefix``, ``prompt`` and the set of them, ``model``. Nothing is
imported here, so the modules can import one another without a cycle through the package."""
