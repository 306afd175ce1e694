"""LoRIS's configuration files, installed as the package ``loris_configs`` and read with importlib.resources.

``default.yaml`` holds every key, ``profiles/`` the quick, default and paper profiles, ``detectors/``
each detector's own config per profile (see pipeline/config.py).
"""
