"""The core floor: mHC on Megatron-Core, with no Megatron-LM training code and no tools.

``config`` (MHCConfig), ``ops`` (float64-testable reference + the ``MHCOps`` type), ``backends``
(kernel availability and dispatch to ``megatron_mhc.kernels``), ``hyper_connection`` (one
sublayer's mappings), ``layer`` (the mHC ``TransformerLayer``), ``specs`` (ModuleSpecs),
``recompute`` (L_r blocks), ``overlap`` (high-priority stream), ``schedule_nodes`` (the MLP merge
as a node of the EP-overlap schedule), ``pipeline`` (stage widths),
``gains`` (signal-gain math). Modules that need megatron-core import it themselves.
"""
