throw new Error('WebRTC is not available: this project runs js-ipfs offline without wrtc/electron-webrtc');
