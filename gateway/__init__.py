"""otp-gateway: a self-hosted missed-call OTP gateway driving Asterisk over AMI."""

__version__ = "0.1.0"
