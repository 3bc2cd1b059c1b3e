"""Agent roles and teams (Ray actors), and the LM client every role calls models through."""
