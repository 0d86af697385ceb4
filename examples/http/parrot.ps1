# Parrot (Windows desktop notification capture) -> Nexus over HTTP.
# Usage: $env:NEXUS_TOKEN = "nxg_..."; .\parrot.ps1 -Gateway https://nexus.example:8443
# Retries with the same id are safe: the gateway answers "duplicate" and journals nothing twice.
param([string]$Gateway = "http://127.0.0.1:8080")

function Send-ParrotNotification($AppId, $AppName, $Title, $Body, $Type = "message") {
    $event = @{
        type    = "parrot.notification"
        source  = "parrot"
        id      = [guid]::NewGuid().ToString()
        payload = @{
            app_id = $AppId; app_name = $AppName; title = $Title; body = $Body
            notification_type = $Type
            received_at = [double]([DateTimeOffset]::UtcNow.ToUnixTimeMilliseconds()) / 1000
        }
    }
    $json = $event | ConvertTo-Json -Depth 5 -Compress
    $headers = @{ Authorization = "Bearer $env:NEXUS_TOKEN" }
    for ($try = 1; $try -le 5; $try++) {
        try {
            $r = Invoke-RestMethod -Method Post -Uri "$Gateway/v1/events" -Headers $headers `
                -ContentType "application/json" -Body $json
            return $r.results[0]   # id, status (accepted | rejected), reason
        } catch {
            # 503 (router restarting) or a dropped connection: the same id again
            Start-Sleep -Seconds $try
        }
    }
    throw "gateway did not answer"
}

Send-ParrotNotification -AppId "outlook" -AppName "Outlook" -Title "Hi" -Body "Lunch?"
