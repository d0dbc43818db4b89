"""Sources: the example app. Connecting a source sends ``api/source.connected``."""
