#![no_std]

// A library target lets the forwarder crate name this one as a build
// dependency, so cargo rebuilds the embedded object when it changes.
