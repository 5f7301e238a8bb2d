"""Hardware-in-the-loop rig: simulated PCS, meters and BMS on real sockets; scenarios, reports."""
