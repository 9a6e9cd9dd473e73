"""The tools floor: what users run (may import the core and the glue; nothing imports it but
``megatron_mhc.__main__``).

``cli`` (the ``megatron-mhc`` command), ``convert`` (checkpoint conversions), ``gain_report``,
``demo``, ``corpus`` (the evidence corpus), ``stability`` (stability-run reports).
"""
