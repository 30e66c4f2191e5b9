"""The PBX boundary: one port (``port``), the AMI driver that implements it (``driver``), the AMI
wire format (``ami``) and the built-in AMI simulator (``simulator``)."""
