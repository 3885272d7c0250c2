//! A minimal UPnP Internet Gateway Device (IGD:1), enough for unmodified
//! miniupnpc (`upnpc`): SSDP answers to M-SEARCH, the device description,
//! and WANIPConnection's AddPortMapping, DeletePortMapping,
//! GetSpecificPortMappingEntry, GetGenericPortMappingEntry,
//! GetExternalIPAddress, GetStatusInfo and GetConnectionTypeInfo (and
//! WANCommonInterfaceConfig's GetCommonLinkProperties, which upnpc asks
//! for its status line). SOAP requests are read with quick-xml; answers
//! are written from fixed templates with every value XML-escaped.

use std::net::{Ipv4Addr, SocketAddrV4};

use quick_xml::escape::escape;
use quick_xml::events::Event;

use super::leases::Protocol;
use super::{Ask, Gateway, Refusal};

pub const SSDP_ADDRESS: Ipv4Addr = Ipv4Addr::new(239, 255, 255, 250);
pub const SSDP_PORT: u16 = 1900;
pub const DESCRIPTION_PATH: &str = "/rootDesc.xml";
pub const WANIP_CONTROL_PATH: &str = "/ctl/IPConn";
pub const COMMON_CONTROL_PATH: &str = "/ctl/CmnIfCfg";

pub const IGD: &str = "urn:schemas-upnp-org:device:InternetGatewayDevice:1";
pub const WAN_DEVICE: &str = "urn:schemas-upnp-org:device:WANDevice:1";
pub const WAN_CONNECTION_DEVICE: &str = "urn:schemas-upnp-org:device:WANConnectionDevice:1";
pub const WANIP: &str = "urn:schemas-upnp-org:service:WANIPConnection:1";
pub const COMMON: &str = "urn:schemas-upnp-org:service:WANCommonInterfaceConfig:1";
/// The largest SOAP request read.
pub const MAX_SOAP_BYTES: usize = 16 * 1024;

/// The device's UUID, stable for one instance and external address (so a
/// control point's cache survives restarts).
pub fn device_uuid(instance: &str, external: Ipv4Addr) -> String {
    use sha2::{Digest, Sha256};
    let digest = Sha256::digest(format!("forwarder-igd/{instance}/{external}"));
    let hex: String = digest[..16].iter().map(|b| format!("{b:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &hex[0..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..32]
    )
}

/// The search targets this device answers, with the USN each gets.
fn targets(uuid: &str) -> Vec<(String, String)> {
    let root = format!("uuid:{uuid}");
    let mut out = vec![
        (
            "upnp:rootdevice".to_string(),
            format!("{root}::upnp:rootdevice"),
        ),
        (root.clone(), root.clone()),
    ];
    for st in [IGD, WAN_DEVICE, WAN_CONNECTION_DEVICE, WANIP, COMMON] {
        out.push((st.to_string(), format!("{root}::{st}")));
    }
    out
}

/// The answers to one SSDP datagram: none unless it is an M-SEARCH with
/// `MAN: "ssdp:discover"` for something this device is.
pub fn ssdp_answers(datagram: &[u8], uuid: &str, location: &str) -> Vec<String> {
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut request = httparse::Request::new(&mut headers);
    let Ok(httparse::Status::Complete(_)) = request.parse(datagram) else {
        return Vec::new();
    };
    if request.method != Some("M-SEARCH") || request.path != Some("*") {
        return Vec::new();
    }
    let header = |name: &str| {
        request
            .headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case(name))
            .and_then(|h| std::str::from_utf8(h.value).ok())
            .map(str::trim)
    };
    if header("MAN").map(|man| man.trim_matches('"')) != Some("ssdp:discover") {
        return Vec::new();
    }
    let Some(st) = header("ST") else {
        return Vec::new();
    };
    targets(uuid)
        .into_iter()
        .filter(|(target, _)| st == "ssdp:all" || st == target)
        .map(|(target, usn)| {
            format!(
                "HTTP/1.1 200 OK\r\nCACHE-CONTROL: max-age=120\r\nST: {target}\r\nUSN: {usn}\r\nEXT:\r\n\
                 SERVER: Linux UPnP/1.1 forwarder/{}\r\nLOCATION: {location}\r\n\r\n",
                env!("CARGO_PKG_VERSION")
            )
        })
        .collect()
}

/// The root device description: IGD → WANDevice → WANConnectionDevice →
/// WANIPConnection, the nesting control points look for.
pub fn description(uuid: &str, base: &str) -> String {
    format!(
        r#"<?xml version="1.0"?>
<root xmlns="urn:schemas-upnp-org:device-1-0">
<specVersion><major>1</major><minor>0</minor></specVersion>
<URLBase>{base}</URLBase>
<device>
<deviceType>{IGD}</deviceType>
<friendlyName>forwarder gateway</friendlyName>
<manufacturer>forwarder</manufacturer>
<modelName>forwarder</modelName>
<modelNumber>{version}</modelNumber>
<UDN>uuid:{uuid}</UDN>
<deviceList>
<device>
<deviceType>{WAN_DEVICE}</deviceType>
<friendlyName>WAN Device</friendlyName>
<manufacturer>forwarder</manufacturer>
<modelName>forwarder</modelName>
<UDN>uuid:{uuid}-wan</UDN>
<serviceList>
<service>
<serviceType>{COMMON}</serviceType>
<serviceId>urn:upnp-org:serviceId:WANCommonIFC1</serviceId>
<SCPDURL>/WANCfg.xml</SCPDURL>
<controlURL>{COMMON_CONTROL_PATH}</controlURL>
<eventSubURL>/evt/CmnIfCfg</eventSubURL>
</service>
</serviceList>
<deviceList>
<device>
<deviceType>{WAN_CONNECTION_DEVICE}</deviceType>
<friendlyName>WAN Connection Device</friendlyName>
<manufacturer>forwarder</manufacturer>
<modelName>forwarder</modelName>
<UDN>uuid:{uuid}-wanconn</UDN>
<serviceList>
<service>
<serviceType>{WANIP}</serviceType>
<serviceId>urn:upnp-org:serviceId:WANIPConn1</serviceId>
<SCPDURL>/WANIPCn.xml</SCPDURL>
<controlURL>{WANIP_CONTROL_PATH}</controlURL>
<eventSubURL>/evt/IPConn</eventSubURL>
</service>
</serviceList>
</device>
</deviceList>
</device>
</deviceList>
</device>
</root>
"#,
        version = env!("CARGO_PKG_VERSION"),
    )
}

/// A SOAP action as read from the request: its name and its arguments.
#[derive(Debug, PartialEq, Eq)]
pub struct Action {
    pub name: String,
    pub args: Vec<(String, String)>,
}

impl Action {
    fn arg(&self, name: &str) -> Option<&str> {
        self.args
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.trim())
    }
}

/// Reads `<Envelope><Body><Action><Arg>value</Arg>...` (namespace prefixes
/// are whatever the client chose; only local names count).
pub fn parse_action(body: &[u8]) -> Result<Action, String> {
    let mut reader = quick_xml::Reader::from_reader(body);
    let mut path: Vec<String> = Vec::new();
    let mut action: Option<Action> = None;
    let mut value = String::new();
    loop {
        match reader.read_event() {
            Err(error) => return Err(format!("malformed SOAP request: {error}")),
            Ok(Event::Eof) => break,
            Ok(Event::Start(start)) => {
                let name = start.local_name().as_ref().to_string();
                if path.len() == 2 && path[1] == "Body" && action.is_none() {
                    action = Some(Action {
                        name: name.clone(),
                        args: Vec::new(),
                    });
                }
                path.push(name);
                value.clear();
            }
            Ok(Event::Empty(empty)) => {
                let name = empty.local_name().as_ref().to_string();
                if path.len() == 2 && path[1] == "Body" && action.is_none() {
                    // `<u:GetExternalIPAddress/>`: an action without arguments.
                    action = Some(Action {
                        name,
                        args: Vec::new(),
                    });
                } else if path.len() == 3
                    && let Some(action) = action.as_mut()
                {
                    // `<NewRemoteHost/>`: an argument with an empty value.
                    action.args.push((name, String::new()));
                }
            }
            Ok(Event::Text(text)) => {
                value.push_str(&text.xml10_content());
            }
            Ok(Event::GeneralRef(reference)) => {
                let resolved = reference
                    .resolve_char_ref()
                    .ok()
                    .flatten()
                    .map(String::from)
                    .or_else(|| {
                        quick_xml::escape::resolve_predefined_entity(reference.as_ref())
                            .map(String::from)
                    })
                    .ok_or_else(|| "an unknown entity in the SOAP request".to_string())?;
                value.push_str(&resolved);
            }
            Ok(Event::End(_)) => {
                if path.len() == 4
                    && let Some(action) = action.as_mut()
                {
                    action
                        .args
                        .push((path[3].clone(), std::mem::take(&mut value)));
                }
                path.pop();
            }
            Ok(_) => {}
        }
    }
    match (path.first(), action) {
        (None, Some(action)) => Ok(action),
        _ => Err("no action inside the SOAP Envelope's Body".into()),
    }
}

/// A SOAP answer: `<u:NameResponse>` with the given values.
pub fn response(service: &str, action: &str, values: &[(&str, String)]) -> String {
    let mut args = String::new();
    for (name, value) in values {
        args.push_str(&format!("<{name}>{}</{name}>", escape(value.as_str())));
    }
    format!(
        "<?xml version=\"1.0\"?>\r\n<s:Envelope xmlns:s=\"http://schemas.xmlsoap.org/soap/envelope/\" \
         s:encodingStyle=\"http://schemas.xmlsoap.org/soap/encoding/\"><s:Body>\
         <u:{action}Response xmlns:u=\"{service}\">{args}</u:{action}Response></s:Body></s:Envelope>\r\n"
    )
}

/// A UPnP error (HTTP 500 with a SOAP Fault).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UpnpError {
    pub code: u16,
    pub description: &'static str,
}

impl UpnpError {
    pub const INVALID_ACTION: Self = Self::new(401, "Invalid Action");
    pub const INVALID_ARGS: Self = Self::new(402, "Invalid Args");
    pub const ACTION_FAILED: Self = Self::new(501, "Action Failed");
    pub const NOT_AUTHORIZED: Self = Self::new(606, "Action not authorized");
    pub const ARRAY_INDEX_INVALID: Self = Self::new(713, "SpecifiedArrayIndexInvalid");
    pub const NO_SUCH_ENTRY: Self = Self::new(714, "NoSuchEntryInArray");
    pub const WILDCARD_EXTERNAL_PORT: Self = Self::new(716, "WildCardNotPermittedInExtPort");
    pub const CONFLICT: Self = Self::new(718, "ConflictInMappingEntry");
    pub const REMOTE_HOST_WILDCARD_ONLY: Self = Self::new(726, "RemoteHostOnlySupportsWildcard");
    pub const NO_PORT_MAPS_AVAILABLE: Self = Self::new(728, "NoPortMapsAvailable");

    const fn new(code: u16, description: &'static str) -> Self {
        Self { code, description }
    }

    pub fn fault(&self) -> String {
        format!(
            "<?xml version=\"1.0\"?>\r\n<s:Envelope xmlns:s=\"http://schemas.xmlsoap.org/soap/envelope/\" \
             s:encodingStyle=\"http://schemas.xmlsoap.org/soap/encoding/\"><s:Body><s:Fault>\
             <faultcode>s:Client</faultcode><faultstring>UPnPError</faultstring><detail>\
             <UPnPError xmlns=\"urn:schemas-upnp-org:control-1-0\"><errorCode>{}</errorCode>\
             <errorDescription>{}</errorDescription></UPnPError></detail></s:Fault></s:Body></s:Envelope>\r\n",
            self.code, self.description
        )
    }
}

fn refusal_code(refusal: &Refusal) -> UpnpError {
    match refusal {
        Refusal::SecureMode { .. } | Refusal::NotAllowed(_) | Refusal::NonceMismatch => {
            UpnpError::NOT_AUTHORIZED
        }
        Refusal::PortTaken(_) => UpnpError::CONFLICT,
        Refusal::Quota { .. } | Refusal::NoResources(_) => UpnpError::NO_PORT_MAPS_AVAILABLE,
        Refusal::NotFound => UpnpError::NO_SUCH_ENTRY,
    }
}

/// The external port and protocol arguments most actions share; UDP only
/// (the relay forwards UDP).
fn external_port(action: &Action) -> Result<u16, UpnpError> {
    if !action.arg("NewRemoteHost").unwrap_or_default().is_empty() {
        return Err(UpnpError::REMOTE_HOST_WILDCARD_ONLY);
    }
    if !action
        .arg("NewProtocol")
        .is_some_and(|p| p.eq_ignore_ascii_case("UDP"))
    {
        // TCP is no mapping this relay can forward; there is no closer code.
        return Err(UpnpError::INVALID_ARGS);
    }
    match action.arg("NewExternalPort").map(str::parse::<u16>) {
        Some(Ok(0)) => Err(UpnpError::WILDCARD_EXTERNAL_PORT),
        Some(Ok(port)) => Ok(port),
        _ => Err(UpnpError::INVALID_ARGS),
    }
}

fn entry_values(lease: &super::leases::Lease) -> Vec<(&'static str, String)> {
    vec![
        ("NewInternalPort", lease.internal.port().to_string()),
        ("NewInternalClient", lease.internal.ip().to_string()),
        ("NewEnabled", "1".into()),
        ("NewPortMappingDescription", lease.description.clone()),
        ("NewLeaseDuration", Gateway::remaining(lease).to_string()),
    ]
}

/// Runs one action of `service` for `requester`; the values of a
/// successful answer, or the UPnP error.
pub async fn handle(
    gateway: &Gateway,
    requester: Ipv4Addr,
    service: &str,
    action: &Action,
) -> Result<Vec<(&'static str, String)>, UpnpError> {
    if service == COMMON {
        return match action.name.as_str() {
            "GetCommonLinkProperties" => Ok(vec![
                ("NewWANAccessType", "Ethernet".into()),
                ("NewLayer1UpstreamMaxBitRate", "1000000000".into()),
                ("NewLayer1DownstreamMaxBitRate", "1000000000".into()),
                ("NewPhysicalLinkStatus", "Up".into()),
            ]),
            _ => Err(UpnpError::INVALID_ACTION),
        };
    }
    match action.name.as_str() {
        "GetExternalIPAddress" => Ok(vec![(
            "NewExternalIPAddress",
            gateway.external_address.to_string(),
        )]),
        "GetStatusInfo" => Ok(vec![
            ("NewConnectionStatus", "Connected".into()),
            ("NewLastConnectionError", "ERROR_NONE".into()),
            ("NewUptime", gateway.uptime().to_string()),
        ]),
        "GetConnectionTypeInfo" => Ok(vec![
            ("NewConnectionType", "IP_Routed".into()),
            ("NewPossibleConnectionTypes", "IP_Routed".into()),
        ]),
        "AddPortMapping" => {
            let external = external_port(action)?;
            let internal_port = action
                .arg("NewInternalPort")
                .and_then(|p| p.parse::<u16>().ok())
                .filter(|&p| p != 0)
                .ok_or(UpnpError::INVALID_ARGS)?;
            let internal_client: Ipv4Addr = action
                .arg("NewInternalClient")
                .and_then(|c| c.parse().ok())
                .ok_or(UpnpError::INVALID_ARGS)?;
            let lease = action
                .arg("NewLeaseDuration")
                .and_then(|d| d.parse::<u32>().ok())
                .unwrap_or(0);
            let ask = Ask {
                protocol: Protocol::Upnp,
                requester,
                internal: SocketAddrV4::new(internal_client, internal_port),
                suggested_external_port: external,
                // IGD:1's 0 is "permanent": the longest lease allowed.
                lifetime: if lease == 0 {
                    gateway.max_lifetime()
                } else {
                    lease
                },
                nonce: None,
                description: action
                    .arg("NewPortMappingDescription")
                    .unwrap_or_default()
                    .chars()
                    .take(64)
                    .collect(),
                exact_port: true,
            };
            gateway
                .map(ask)
                .await
                .map(|_| Vec::new())
                .map_err(|refusal| refusal_code(&refusal))
        }
        "DeletePortMapping" => {
            let external = external_port(action)?;
            gateway
                .delete_external(requester, external)
                .map(|()| Vec::new())
                .map_err(|refusal| refusal_code(&refusal))
        }
        "GetSpecificPortMappingEntry" => {
            let external = external_port(action)?;
            let lease = gateway.lookup(external).ok_or(UpnpError::NO_SUCH_ENTRY)?;
            Ok(entry_values(&lease))
        }
        "GetGenericPortMappingEntry" => {
            let index = action
                .arg("NewPortMappingIndex")
                .and_then(|i| i.parse::<usize>().ok())
                .ok_or(UpnpError::INVALID_ARGS)?;
            let lease = gateway.nth(index).ok_or(UpnpError::ARRAY_INDEX_INVALID)?;
            let mut values = vec![
                ("NewRemoteHost", String::new()),
                ("NewExternalPort", lease.external_port.to_string()),
                ("NewProtocol", "UDP".into()),
            ];
            values.extend(entry_values(&lease));
            Ok(values)
        }
        _ => Err(UpnpError::INVALID_ACTION),
    }
}

/// The service and action a SOAPAction header names:
/// `"urn:schemas-upnp-org:service:WANIPConnection:1#AddPortMapping"`.
pub fn soap_action(header: &str) -> Option<(&str, &str)> {
    header.trim().trim_matches('"').split_once('#')
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What miniupnpc 2.2 sends for AddPortMapping.
    const ADD: &str = r#"<?xml version="1.0"?>
<s:Envelope xmlns:s="http://schemas.xmlsoap.org/soap/envelope/" s:encodingStyle="http://schemas.xmlsoap.org/soap/encoding/"><s:Body><u:AddPortMapping xmlns:u="urn:schemas-upnp-org:service:WANIPConnection:1"><NewRemoteHost></NewRemoteHost><NewExternalPort>60010</NewExternalPort><NewProtocol>UDP</NewProtocol><NewInternalPort>60001</NewInternalPort><NewInternalClient>10.77.2.2</NewInternalClient><NewEnabled>1</NewEnabled><NewPortMappingDescription>mosh &amp; co</NewPortMappingDescription><NewLeaseDuration>0</NewLeaseDuration></u:AddPortMapping></s:Body></s:Envelope>"#;

    #[test]
    fn reads_soap_actions() {
        let action = parse_action(ADD.as_bytes()).unwrap();
        assert_eq!(action.name, "AddPortMapping");
        assert_eq!(action.arg("NewExternalPort"), Some("60010"));
        assert_eq!(action.arg("NewRemoteHost"), Some(""));
        assert_eq!(action.arg("NewPortMappingDescription"), Some("mosh & co"));
        assert_eq!(action.args.len(), 8);
        assert_eq!(external_port(&action), Ok(60010));
        let empty = parse_action(
            br#"<e:Envelope xmlns:e="x"><e:Body><m:GetExternalIPAddress xmlns:m="y"/></e:Body></e:Envelope>"#,
        )
        .unwrap();
        assert_eq!(empty.name, "GetExternalIPAddress");
        assert!(empty.args.is_empty());
        let open = parse_action(
            br#"<e:Envelope xmlns:e="x"><e:Body><m:GetExternalIPAddress xmlns:m="y"></m:GetExternalIPAddress></e:Body></e:Envelope>"#,
        )
        .unwrap();
        assert_eq!(open.name, "GetExternalIPAddress");
        assert!(open.args.is_empty());
    }

    #[test]
    fn refuses_malformed_soap() {
        for body in [
            &b""[..],
            b"<s:Envelope><s:Body><u:Add><NewExternalPort>1</NewProtocol></u:Add></s:Body></s:Envelope>",
            b"<s:Envelope><s:Body>",
            b"<s:Envelope><s:Body></s:Body></s:Envelope>",
            b"<a><b>&bogus;</b></a>",
        ] {
            assert!(parse_action(body).is_err(), "{}", String::from_utf8_lossy(body));
        }
        let tcp = parse_action(ADD.replace(">UDP<", ">TCP<").as_bytes()).unwrap();
        assert_eq!(external_port(&tcp), Err(UpnpError::INVALID_ARGS));
        let remote = parse_action(
            ADD.replace(
                "<NewRemoteHost></NewRemoteHost>",
                "<NewRemoteHost>1.2.3.4</NewRemoteHost>",
            )
            .as_bytes(),
        )
        .unwrap();
        assert_eq!(
            external_port(&remote),
            Err(UpnpError::REMOTE_HOST_WILDCARD_ONLY)
        );
        let wildcard = parse_action(ADD.replace(">60010<", ">0<").as_bytes()).unwrap();
        assert_eq!(
            external_port(&wildcard),
            Err(UpnpError::WILDCARD_EXTERNAL_PORT)
        );
    }

    #[test]
    fn answers_and_faults_read_back() {
        let text = response(
            WANIP,
            "GetExternalIPAddress",
            &[("NewExternalIPAddress", "<1>".into())],
        );
        let action = parse_action(text.as_bytes()).unwrap();
        assert_eq!(action.name, "GetExternalIPAddressResponse");
        assert_eq!(
            action.args,
            vec![("NewExternalIPAddress".into(), "<1>".into())]
        );
        let fault = UpnpError::CONFLICT.fault();
        assert!(fault.contains("<errorCode>718</errorCode>"), "{fault}");
        assert_eq!(
            soap_action("\"urn:schemas-upnp-org:service:WANIPConnection:1#AddPortMapping\""),
            Some((WANIP, "AddPortMapping"))
        );
    }

    #[test]
    fn ssdp_answers_only_searches_for_this_device() {
        let uuid = device_uuid("default", Ipv4Addr::new(198, 51, 100, 1));
        assert_eq!(uuid.len(), 36);
        let search = |st: &str| {
            format!(
                "M-SEARCH * HTTP/1.1\r\nHOST: 239.255.255.250:1900\r\nMAN: \"ssdp:discover\"\r\nMX: 2\r\nST: {st}\r\n\r\n"
            )
        };
        let answers = ssdp_answers(
            search(IGD).as_bytes(),
            &uuid,
            "http://10.0.0.1:5000/rootDesc.xml",
        );
        assert_eq!(answers.len(), 1);
        assert!(answers[0].contains("LOCATION: http://10.0.0.1:5000/rootDesc.xml\r\n"));
        assert!(answers[0].contains(&format!("USN: uuid:{uuid}::{IGD}")));
        assert_eq!(
            ssdp_answers(search("ssdp:all").as_bytes(), &uuid, "x").len(),
            7
        );
        assert!(
            ssdp_answers(
                search("urn:schemas-upnp-org:device:MediaServer:1").as_bytes(),
                &uuid,
                "x"
            )
            .is_empty()
        );
        assert!(
            ssdp_answers(
                b"NOTIFY * HTTP/1.1\r\nNT: upnp:rootdevice\r\n\r\n",
                &uuid,
                "x"
            )
            .is_empty()
        );
        assert!(
            ssdp_answers(b"M-SEARCH * HTTP/1.1\r\nST: ssdp:all\r\n\r\n", &uuid, "x").is_empty()
        );
        assert!(ssdp_answers(b"\x00\x01garbage", &uuid, "x").is_empty());
    }

    #[test]
    fn the_description_is_well_formed() {
        let text = description("u", "http://10.0.0.1:5000/");
        let mut reader = quick_xml::Reader::from_str(&text);
        let mut services = 0;
        loop {
            match reader.read_event().unwrap() {
                Event::Eof => break,
                Event::Start(start) if start.local_name().as_ref() == "service" => services += 1,
                _ => {}
            }
        }
        assert_eq!(services, 2);
        assert!(text.contains(WANIP_CONTROL_PATH));
    }
}
