"""The deployable bundle an app team ships: its sealed manifest and the one way to add a section to it
(``manifest``), running it with onnxruntime-genai alone (``runner``: generate, verify), and the
mobile-readiness report (``readiness``). The bundle stage (``edgepeft.stages.bundle``) writes it.
"""
