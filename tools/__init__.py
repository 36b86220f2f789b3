"""zfkeras command-line tools, installed as the package `zfkeras_tools`."""
