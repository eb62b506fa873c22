"""Flora's bundled YAML configs (installed as the package data ``flora.configs``; see
``flora.config.find_config`` for the lookup: the path as given, the user's ./config/, then these)."""
