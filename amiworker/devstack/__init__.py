"""A whole local installation: the embedded store (nx-27017), simulators and a
fleet as child processes, and the demo that runs them together."""
