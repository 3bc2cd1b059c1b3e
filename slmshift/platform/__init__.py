"""The runtime every part shares. Imports no sibling package (ARCHITECTURE.md, "Which part may use which")."""
