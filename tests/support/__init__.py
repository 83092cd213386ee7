"""What the tests share and are not tests themselves: subprocess environments, worker scripts
run as separate processes (`python -m tests.support.<worker>`), damage helpers, HLO readers,
small configs and datasets."""
