"""fleetkeeper.relay"""
